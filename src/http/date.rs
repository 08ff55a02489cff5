//! The `Date` field (RFC 9110 §6.6.1) of the responses the gateway sends:
//! its own (an origin server with a clock MUST date its 2xx-4xx; we date
//! all) and relayed ones the app sent without one (a recipient with a
//! clock MUST add it before forwarding). Formatted once a second per core
//! (a thread-local), read off the coarse real-time clock: one cheap clock
//! read and a 37-byte copy per response.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `date: ` + 29 bytes of IMF-fixdate + CRLF.
const LINE_LEN: usize = 6 + 29 + 2;

struct Cached {
    secs: u64,
    line: [u8; LINE_LEN],
}

thread_local! {
    static CACHED: RefCell<Cached> = const {
        RefCell::new(Cached {
            secs: u64::MAX,
            line: [0; LINE_LEN],
        })
    };
}

/// Seconds since the epoch from `CLOCK_REALTIME_COARSE` (the last tick:
/// plenty for a field of one-second resolution, and cheaper than a
/// precise read).
fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        ts.tv_sec.max(0) as u64
    } else {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }
}

/// Appends `date: <now as IMF-fixdate>\r\n`.
pub fn write_date_field(out: &mut Vec<u8>) {
    let secs = now_secs();
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.secs != secs {
            // IMF-fixdate is 29 bytes for every year 1970..=9999 (httpdate's range).
            let date = httpdate::HttpDate::from(UNIX_EPOCH + Duration::from_secs(secs));
            let mut w = &mut c.line[..];
            let _ = write!(w, "date: {date}\r\n");
            debug_assert!(w.is_empty());
            c.secs = secs;
        }
        out.extend_from_slice(&c.line);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_is_now_as_an_imf_fixdate() {
        let before = SystemTime::now();
        let mut out = Vec::new();
        write_date_field(&mut out);
        write_date_field(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        let value = lines[0].strip_prefix("date: ").unwrap();
        assert_eq!(value.len(), 29);
        assert!(value.ends_with(" GMT"), "{value}");
        let when = httpdate::parse_http_date(value).unwrap();
        let skew = |a: SystemTime, b: SystemTime| {
            a.duration_since(b)
                .or_else(|_| b.duration_since(a))
                .unwrap()
        };
        // The coarse clock lags by at most a tick; a second boundary may
        // fall between the reads.
        assert!(skew(when, before) <= Duration::from_secs(2), "{value}");
        let second = lines[1].strip_prefix("date: ").unwrap();
        let later = httpdate::parse_http_date(second).unwrap();
        assert!(skew(later, when) <= Duration::from_secs(1));
    }
}
