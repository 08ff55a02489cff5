//! Which cores, and which receiver instances, hold the tunnels of each
//! identity (sans-IO; `Shared` keeps one behind a mutex, taken only when a
//! tunnel joins or leaves and on the counted cross-core fallback).
//!
//! A receiver names itself with `X-ANPX-Instance` on the upgrade (its
//! `instance_id`, generated and kept next to its config when not set), so
//! one receiver's many tunnels can be told from a second receiver that
//! presents the same credentials. What a second instance gets is the
//! `duplicate_tunnels` policy (docs/OPERATIONS.md): `share` (both serve,
//! with a warning), `refuse` (409 while the first holds tunnels) or
//! `replace` (the newcomer's tunnels stay, the others are closed).
//! Tunnels that send no instance (the Python reference) all count as one
//! instance, the empty name.
//!
//! Tunnels that scale with load (`scale`, PROTOCOL.md §7.8) are asked for
//! here ([`TunnelBook::ask`]: one core at a time, never beyond `workers`),
//! placed on the core that asked, and let go here
//! ([`TunnelBook::release`]: never the identity's last).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::routes::IdentityName;
use crate::config::DuplicateTunnels;

/// One identity's tunnels.
#[derive(Debug, Default)]
struct Holdings {
    /// Tunnels per core (index = core).
    per_core: Vec<usize>,
    /// Tunnels per receiver instance, in order of arrival.
    instances: Vec<(String, usize)>,
    /// Tunnels whose receiver negotiated `scale`: only those can be asked
    /// for more, or let go.
    scalable: usize,
    /// Cores a tunnel was asked for, and when: the next tunnel that can
    /// move goes to the oldest; forgotten after [`ASK_TTL`].
    asked: Vec<(usize, Instant)>,
}

/// How long an ask for a tunnel stands: after it, a core that still hands
/// requests off may ask again (the receiver may have failed to dial, or
/// its tunnel landed on another core and could not move).
pub const ASK_TTL: Duration = Duration::from_secs(10);

/// What [`TunnelBook::ask`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    /// Tell a tunnel on core `holder` that the receiver should keep
    /// `want` tunnels.
    More { holder: usize, want: usize },
    /// The identity has `workers` tunnels already, but core `from` holds
    /// two or more (TLS tunnels land where they are accepted, after a
    /// restart too): let one of those go; the core that asked gets the
    /// next one.
    Move { from: usize },
}

impl Holdings {
    fn total(&self) -> usize {
        self.per_core.iter().sum()
    }

    fn forget_old_asks(&mut self, now: Instant) {
        self.asked
            .retain(|(_, at)| now.saturating_duration_since(*at) < ASK_TTL);
    }
}

/// The outcome of [`TunnelBook::place`].
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// Counted on `core`. `others`: instances other than this one that
    /// hold tunnels of the identity (`share`: warn; `replace`: close them).
    Placed { core: usize, others: Vec<String> },
    /// `refuse`: another instance holds tunnels; nothing was counted.
    Refused { others: Vec<String> },
    /// `scale`: the tunnel cannot move (TLS), and lands on a core that
    /// already holds one of the identity while one was asked for core
    /// `asked`: the receiver should dial again (its next connection may be
    /// accepted there). Nothing was counted.
    Elsewhere { asked: usize },
}

#[derive(Debug)]
pub struct TunnelBook {
    workers: usize,
    by_identity: HashMap<IdentityName, Holdings>,
}

impl TunnelBook {
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            by_identity: HashMap::new(),
        }
    }

    /// Admits a tunnel of `identity` from `instance` under `policy` and
    /// counts it on the core a tunnel was asked for, else on the one with
    /// the fewest tunnels of that identity (`here` on a tie, or always
    /// `here` when the connection cannot move). `scale`: its receiver
    /// negotiated `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        identity: &IdentityName,
        instance: &str,
        scale: bool,
        here: usize,
        movable: bool,
        policy: DuplicateTunnels,
        now: Instant,
    ) -> Placement {
        let workers = self.workers;
        let h = self
            .by_identity
            .entry(identity.clone())
            .or_insert_with(|| Holdings {
                per_core: vec![0; workers],
                instances: Vec::new(),
                scalable: 0,
                asked: Vec::new(),
            });
        let others: Vec<String> = h
            .instances
            .iter()
            .filter(|(id, n)| id != instance && *n > 0)
            .map(|(id, _)| id.clone())
            .collect();
        if !others.is_empty() && policy == DuplicateTunnels::Refuse {
            return Placement::Refused { others };
        }
        h.forget_old_asks(now);
        if !movable && h.per_core.get(here).is_some_and(|n| *n > 0) {
            if let Some(&(asked, _)) = h.asked.iter().find(|(c, _)| h.per_core[*c] == 0) {
                return Placement::Elsewhere { asked };
            }
        }
        let mut best = here;
        if movable {
            for (core, n) in h.per_core.iter().enumerate() {
                if *n < h.per_core[best] {
                    best = core;
                }
            }
            if let Some(&(core, _)) = h.asked.first() {
                best = core;
            }
        }
        h.asked.retain(|(core, _)| *core != best);
        h.per_core[best] += 1;
        h.scalable += usize::from(scale);
        match h.instances.iter_mut().find(|(id, _)| id == instance) {
            Some((_, n)) => *n += 1,
            None => h.instances.push((instance.to_owned(), 1)),
        }
        Placement::Placed { core: best, others }
    }

    /// A tunnel counted by [`place`](Self::place) on `core` is gone.
    pub fn left(&mut self, identity: &IdentityName, instance: &str, scale: bool, core: usize) {
        let Some(h) = self.by_identity.get_mut(identity) else {
            return;
        };
        if let Some(n) = h.per_core.get_mut(core) {
            *n = n.saturating_sub(1);
        }
        h.scalable = h.scalable.saturating_sub(usize::from(scale));
        if let Some(i) = h.instances.iter().position(|(id, _)| id == instance) {
            h.instances[i].1 = h.instances[i].1.saturating_sub(1);
            if h.instances[i].1 == 0 {
                h.instances.remove(i);
            }
        }
        if h.per_core.iter().all(|n| *n == 0) {
            self.by_identity.remove(identity);
        }
    }

    /// Core `core` holds no tunnel of `identity` and hands its requests to
    /// other cores often enough that one would pay: ask the receiver for
    /// one more, unless one is already asked for this core or no receiver
    /// of it negotiated `scale`. When the identity has `workers` tunnels
    /// (with those asked for), one on a core that holds two or more is
    /// moved instead; otherwise nothing.
    pub fn ask(&mut self, identity: &str, core: usize, now: Instant) -> Option<Ask> {
        let workers = self.workers;
        let h = self.by_identity.get_mut(identity)?;
        h.forget_old_asks(now);
        let total = h.total();
        if h.scalable == 0
            || h.per_core.get(core).is_none_or(|n| *n > 0)
            || h.asked.iter().any(|(c, _)| *c == core)
        {
            return None;
        }
        if total + h.asked.len() >= workers {
            let from = h.per_core.iter().position(|n| *n >= 2)?;
            return Some(Ask::Move { from });
        }
        h.asked.push((core, now));
        let holder = h.per_core.iter().position(|n| *n > 0)?;
        Some(Ask::More {
            holder,
            want: total + h.asked.len(),
        })
    }

    /// Lets a scaled-up tunnel of `identity` on `core` go: uncounted like
    /// [`left`](Self::left), unless it is the identity's last (false).
    pub fn release(&mut self, identity: &IdentityName, instance: &str, core: usize) -> bool {
        let Some(h) = self.by_identity.get(identity) else {
            return false;
        };
        if h.total() <= 1 || h.per_core.get(core).is_none_or(|n| *n == 0) {
            return false;
        }
        self.left(identity, instance, true, core);
        true
    }

    /// A core other than `not` with a tunnel for `identity`, spread by `hint`.
    pub fn remote_core(&self, identity: &str, not: usize, hint: u64) -> Option<usize> {
        let h = self.by_identity.get(identity)?;
        let with = || {
            h.per_core
                .iter()
                .enumerate()
                .filter(move |(c, k)| *c != not && **k > 0)
                .map(|(c, _)| c)
        };
        let n = with().count();
        if n == 0 {
            return None;
        }
        with().nth((hint as usize) % n)
    }

    /// identity → tunnels per core, sorted by identity (admin; cold path).
    pub fn per_core(&self) -> Vec<(IdentityName, Vec<usize>)> {
        let mut v: Vec<_> = self
            .by_identity
            .iter()
            .map(|(k, h)| (k.clone(), h.per_core.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// identity → (instance, tunnels), sorted by identity (admin).
    pub fn instances(&self) -> Vec<(IdentityName, Vec<(String, usize)>)> {
        let mut v: Vec<_> = self
            .by_identity
            .iter()
            .map(|(k, h)| (k.clone(), h.instances.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DuplicateTunnels::*;

    fn id(s: &str) -> IdentityName {
        s.into()
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_core_that_asks_gets_the_next_tunnel_once_and_never_beyond_workers() {
        let mut b = TunnelBook::new(3);
        let a = id("alice");
        let t = now();
        // A receiver without `scale` is never asked.
        b.place(&a, "old", false, 0, true, Share, t);
        assert_eq!(b.ask("alice", 1, t), None);
        b.left(&a, "old", false, 0);
        b.place(&a, "r1", true, 0, true, Refuse, t);
        assert_eq!(b.ask("alice", 0, t), None, "core 0 holds one");
        assert_eq!(b.ask("alice", 2, t), Some(Ask::More { holder: 0, want: 2 }));
        assert_eq!(b.ask("alice", 2, t), None, "asked already");
        assert_eq!(b.ask("alice", 1, t), Some(Ask::More { holder: 0, want: 3 }));
        // The next movable tunnel lands where it was first asked for, even
        // when accepted elsewhere.
        assert_eq!(
            b.place(&a, "r1", true, 1, true, Refuse, t),
            Placement::Placed {
                core: 2,
                others: vec![]
            }
        );
        assert_eq!(
            b.place(&a, "r1", true, 0, true, Refuse, t),
            Placement::Placed {
                core: 1,
                others: vec![]
            }
        );
        assert_eq!(b.per_core(), vec![(a.clone(), vec![1, 1, 1])]);
        assert_eq!(b.ask("alice", 1, t), None, "workers reached");
        // An ask that was never answered is forgotten after ASK_TTL.
        let mut b = TunnelBook::new(2);
        b.place(&a, "r1", true, 0, true, Refuse, t);
        assert!(b.ask("alice", 1, t).is_some());
        assert_eq!(b.ask("alice", 1, t + ASK_TTL / 2), None);
        assert_eq!(
            b.ask("alice", 1, t + ASK_TTL),
            Some(Ask::More { holder: 0, want: 2 })
        );
        assert_eq!(b.ask("nobody", 1, t), None);
    }

    #[test]
    fn a_tunnel_that_cannot_move_is_sent_to_dial_again_while_another_core_waits() {
        let mut b = TunnelBook::new(2);
        let a = id("alice");
        let t = now();
        b.place(&a, "r1", true, 0, false, Refuse, t);
        assert_eq!(b.ask("alice", 1, t), Some(Ask::More { holder: 0, want: 2 }));
        assert_eq!(
            b.place(&a, "r1", true, 0, false, Refuse, t),
            Placement::Elsewhere { asked: 1 }
        );
        assert_eq!(
            b.per_core(),
            vec![(a.clone(), vec![1, 0])],
            "nothing counted"
        );
        assert_eq!(
            b.place(&a, "r1", true, 1, false, Refuse, t),
            Placement::Placed {
                core: 1,
                others: vec![]
            }
        );
        // No ask standing: a tunnel that cannot move stays where it lands.
        assert_eq!(
            b.place(&a, "r1", true, 0, false, Refuse, t),
            Placement::Placed {
                core: 0,
                others: vec![]
            }
        );
        // Nor once the ask is old.
        let mut b = TunnelBook::new(2);
        b.place(&a, "r1", true, 0, false, Refuse, t);
        b.ask("alice", 1, t);
        assert!(matches!(
            b.place(&a, "r1", true, 0, false, Refuse, t + ASK_TTL),
            Placement::Placed { core: 0, .. }
        ));
    }

    #[test]
    fn release_never_takes_the_last_tunnel() {
        let mut b = TunnelBook::new(2);
        let a = id("alice");
        let t = now();
        b.place(&a, "r1", true, 0, true, Refuse, t);
        b.place(&a, "r1", true, 0, true, Refuse, t);
        assert_eq!(b.per_core(), vec![(a.clone(), vec![1, 1])]);
        assert!(!b.release(&a, "r1", 5), "no such core");
        assert!(b.release(&a, "r1", 1));
        assert!(!b.release(&a, "r1", 1), "none left there");
        assert!(!b.release(&a, "r1", 0), "the last one stays");
        assert_eq!(b.per_core(), vec![(a.clone(), vec![1, 0])]);
        // Released, core 1 may ask again.
        assert_eq!(b.ask("alice", 1, t), Some(Ask::More { holder: 0, want: 2 }));
    }

    #[test]
    fn two_tunnels_that_cannot_move_stuck_on_one_core_are_spread() {
        // After a restart a receiver's TLS tunnels land where the kernel
        // accepts them: both on core 0, say.
        let mut b = TunnelBook::new(2);
        let a = id("alice");
        let t = now();
        b.place(&a, "r1", true, 0, false, Refuse, t);
        b.place(&a, "r1", true, 0, false, Refuse, t);
        assert_eq!(b.ask("alice", 1, t), Some(Ask::Move { from: 0 }));
        assert!(b.release(&a, "r1", 0));
        assert_eq!(b.ask("alice", 1, t), Some(Ask::More { holder: 0, want: 2 }));
        // With one on each core nothing moves.
        let mut b = TunnelBook::new(2);
        b.place(&a, "r1", true, 0, false, Refuse, t);
        b.place(&a, "r1", true, 1, false, Refuse, t);
        assert_eq!(b.ask("alice", 1, t), None);
    }

    #[test]
    fn one_instance_spreads_over_cores() {
        let mut b = TunnelBook::new(2);
        let a = id("alice");
        assert_eq!(
            b.place(&a, "r1", false, 0, true, Refuse, now()),
            Placement::Placed {
                core: 0,
                others: vec![]
            }
        );
        assert_eq!(
            b.place(&a, "r1", false, 0, true, Refuse, now()),
            Placement::Placed {
                core: 1,
                others: vec![]
            }
        );
        assert_eq!(b.remote_core("alice", 0, 7), Some(1));
        assert_eq!(b.instances(), vec![(a.clone(), vec![("r1".into(), 2)])]);
        b.left(&a, "r1", false, 0);
        b.left(&a, "r1", false, 1);
        assert!(b.per_core().is_empty());
    }

    #[test]
    fn policies_for_a_second_instance() {
        let a = id("alice");
        for (policy, refused) in [(Share, false), (Replace, false), (Refuse, true)] {
            let mut b = TunnelBook::new(2);
            b.place(&a, "r1", false, 0, true, policy, now());
            let p = b.place(&a, "rogue", false, 1, true, policy, now());
            if refused {
                assert_eq!(
                    p,
                    Placement::Refused {
                        others: vec!["r1".into()]
                    }
                );
                assert_eq!(b.instances()[0].1, vec![("r1".into(), 1)]);
            } else {
                assert_eq!(
                    p,
                    Placement::Placed {
                        core: 1,
                        others: vec!["r1".into()]
                    }
                );
            }
        }
    }

    #[test]
    fn a_refused_instance_is_admitted_once_the_first_left() {
        let mut b = TunnelBook::new(1);
        let a = id("alice");
        b.place(&a, "r1", false, 0, false, Refuse, now());
        assert!(matches!(
            b.place(&a, "r2", false, 0, false, Refuse, now()),
            Placement::Refused { .. }
        ));
        b.left(&a, "r1", false, 0);
        assert!(matches!(
            b.place(&a, "r2", false, 0, false, Refuse, now()),
            Placement::Placed { .. }
        ));
    }
}
