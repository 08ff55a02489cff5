//! UTC timestamps as DID-WBA writes them (`YYYY-MM-DDTHH:MM:SSZ`, what the
//! SDKs emit with `strftime('%Y-%m-%dT%H:%M:%SZ')`), and the civil-date
//! arithmetic behind them (H. Hinnant's `days_from_civil`), so no date
//! crate is needed for two small functions.

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)` to Unix seconds (the
/// fraction is dropped). The SDK verifiers use `datetime.fromisoformat`,
/// which accepts the same shapes; a time without an offset is refused
/// there too (naive and aware datetimes do not compare).
pub fn parse_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &b[r];
        if !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 59
    {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6
                || !(o[0] == b'+' || o[0] == b'-')
                || o[3] != b':'
                || ![o[1], o[2], o[4], o[5]].iter().all(u8::is_ascii_digit)
            {
                return None;
            }
            let oh = i64::from(o[1] - b'0') * 10 + i64::from(o[2] - b'0');
            let om = i64::from(o[4] - b'0') * 10 + i64::from(o[5] - b'0');
            if oh > 23 || om > 59 {
                return None;
            }
            let v = oh * 3600 + om * 60;
            if o[0] == b'+' {
                v
            } else {
                -v
            }
        }
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2024-02-29T12:34:56Z"), Some(1_709_210_096));
        assert_eq!(parse_utc("2024-02-29T12:34:56.789Z"), Some(1_709_210_096));
        assert_eq!(parse_utc("2024-02-29T14:34:56+02:00"), Some(1_709_210_096));
        assert_eq!(format_utc(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn round_trips_over_centuries() {
        for t in (-5_000_000_000i64..10_000_000_000).step_by(86_399 * 37) {
            assert_eq!(parse_utc(&format_utc(t)), Some(t), "{t}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_utc_instant() {
        for s in [
            "",
            "2024-02-29 12:34:56Z",
            "2024-02-30T12:34:56Z",
            "2023-02-29T12:34:56Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0200",
            "+024-01-01T00:00:00Z",
            "2024-01-01T00:00:00Zjunk",
        ] {
            assert_eq!(parse_utc(s), None, "{s:?}");
        }
    }
}
