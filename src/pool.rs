//! Per-core buffer pools: read buffers and response-head buffers handed
//! to a connection while it works on a request and taken back while it
//! idles, so an idle keep-alive connection holds no buffer and a busy one
//! does not allocate per request. `Rc`-owned by one core: no locks.
//! [`FreeList`] is the same for the tunnels' buffers (`ws/conn.rs`: read
//! buffers and write batches, one thread-local list each), so an idle
//! tunnel holds none of them either.

pub mod queue;

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers larger than this are not kept (a big body grew them).
const KEEP_MAX: usize = 64 * 1024;

pub struct BufPool {
    reads: RefCell<Vec<BytesMut>>,
    writes: RefCell<Vec<Vec<u8>>>,
    read_size: usize,
    cap: usize,
}

impl BufPool {
    /// `cap` buffers of each kind are kept at most.
    pub fn new(read_size: usize, cap: usize) -> Self {
        Self {
            reads: RefCell::new(Vec::new()),
            writes: RefCell::new(Vec::new()),
            read_size,
            cap,
        }
    }

    /// How large a read buffer the pool lends (and keeps).
    pub fn read_size(&self) -> usize {
        self.read_size
    }

    pub fn take_read(&self) -> BytesMut {
        self.reads
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.read_size))
    }

    /// Returns an empty read buffer; one still sharing its storage with
    /// frozen slices, or grown large, is dropped instead.
    pub fn give_read(&self, mut b: BytesMut) {
        debug_assert!(b.is_empty());
        b.clear();
        // `try_reclaim` succeeds only if no `Bytes` still points into it.
        if b.capacity() <= KEEP_MAX && b.try_reclaim(self.read_size) {
            let mut v = self.reads.borrow_mut();
            if v.len() < self.cap {
                v.push(b);
            }
        }
    }

    pub fn take_write(&self) -> Vec<u8> {
        self.writes.borrow_mut().pop().unwrap_or_default()
    }

    pub fn give_write(&self, mut b: Vec<u8>) {
        b.clear();
        if b.capacity() > 0 && b.capacity() <= KEEP_MAX {
            let mut v = self.writes.borrow_mut();
            if v.len() < self.cap {
                v.push(b);
            }
        }
    }
}

/// A bounded free list of one thread (a core's runtime), for a
/// `thread_local!`: what a busy connection borrows and an idle one gives
/// back. No locks; at most `keep` items are kept, surplus ones dropped.
pub struct FreeList<T> {
    items: RefCell<Vec<T>>,
    keep: usize,
}

impl<T> FreeList<T> {
    pub const fn new(keep: usize) -> Self {
        Self {
            items: RefCell::new(Vec::new()),
            keep,
        }
    }

    pub fn take(&self) -> Option<T> {
        self.items.borrow_mut().pop()
    }

    /// Keeps `t` unless the list is full. The caller has already decided
    /// it is worth keeping (cleared, not grown too large).
    pub fn give(&self, t: T) {
        let mut v = self.items.borrow_mut();
        if v.len() < self.keep {
            v.push(t);
            return;
        }
        // Dropped after the borrow ends (crate::sync: no borrow held while
        // a value with a `Drop` goes).
        drop(v);
        drop(t);
    }

    /// Items kept (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.items.borrow().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frame heads (ANPX header and TLVs before and after a body that travels
/// as its own buffer, [`crate::ws::conn::Outgoing::Parts`]) and whole
/// small frames ([`crate::ws::conn::Outgoing::Binary`], from
/// `anpx::encode_message_with`): taken by the encoder, given back by the
/// tunnel writer once it has copied them into its batch (a large frame,
/// sent as its own iovec, is not kept). One free list per thread (a
/// core's runtime): no locks.
pub mod frame_heads {
    use std::cell::RefCell;

    use bytes::BytesMut;

    /// Kept at most per thread.
    const KEEP: usize = 1024;
    /// Capacity of a new head, and the largest one kept.
    const SIZE: usize = 512;
    const KEEP_MAX: usize = 4096;

    thread_local! {
        static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer for a frame head.
    pub fn take() -> BytesMut {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
    }

    /// Buffers kept now (tests).
    #[cfg(test)]
    pub fn len() -> usize {
        FREE.with(|f| f.borrow().len())
    }

    /// Returns a head; large or surplus ones are dropped.
    pub fn give(mut b: BytesMut) {
        if b.capacity() > KEEP_MAX {
            return;
        }
        b.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_unless_shared_or_large() {
        let p = BufPool::new(4096, 2);
        let mut b = p.take_read();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = b.split().freeze();
        p.give_read(b); // storage still shared with `head`: not pooled
        assert_eq!(p.reads.borrow().len(), 0);
        drop(head);
        let b = p.take_read();
        p.give_read(b);
        assert_eq!(p.reads.borrow().len(), 1);
        let mut w = p.take_write();
        w.extend_from_slice(&[0; 100]);
        p.give_write(w);
        assert_eq!(p.writes.borrow().len(), 1);
        p.give_write(Vec::with_capacity(KEEP_MAX + 1));
        assert_eq!(p.writes.borrow().len(), 1);
    }

    #[test]
    fn free_list_keeps_at_most_its_bound() {
        let l = FreeList::new(2);
        assert!(l.take().is_none());
        for i in 0..3 {
            l.give(vec![i]);
        }
        assert_eq!(l.len(), 2);
        assert_eq!(l.take(), Some(vec![1]));
        assert_eq!(l.take(), Some(vec![0]));
        assert!(l.is_empty());
    }
}
