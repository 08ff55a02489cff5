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

use std::collections::HashMap;

use super::routes::IdentityName;
use crate::config::DuplicateTunnels;

/// One identity's tunnels.
#[derive(Debug, Default)]
struct Holdings {
    /// Tunnels per core (index = core).
    per_core: Vec<usize>,
    /// Tunnels per receiver instance, in order of arrival.
    instances: Vec<(String, usize)>,
}

/// The outcome of [`TunnelBook::place`].
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// Counted on `core`. `others`: instances other than this one that
    /// hold tunnels of the identity (`share`: warn; `replace`: close them).
    Placed { core: usize, others: Vec<String> },
    /// `refuse`: another instance holds tunnels; nothing was counted.
    Refused { others: Vec<String> },
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
    /// counts it on the core with the fewest tunnels of that identity
    /// (`here` on a tie, or always `here` when the connection cannot move).
    pub fn place(
        &mut self,
        identity: &IdentityName,
        instance: &str,
        here: usize,
        movable: bool,
        policy: DuplicateTunnels,
    ) -> Placement {
        let workers = self.workers;
        let h = self
            .by_identity
            .entry(identity.clone())
            .or_insert_with(|| Holdings {
                per_core: vec![0; workers],
                instances: Vec::new(),
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
        let mut best = here;
        if movable {
            for (core, n) in h.per_core.iter().enumerate() {
                if *n < h.per_core[best] {
                    best = core;
                }
            }
        }
        h.per_core[best] += 1;
        match h.instances.iter_mut().find(|(id, _)| id == instance) {
            Some((_, n)) => *n += 1,
            None => h.instances.push((instance.to_owned(), 1)),
        }
        Placement::Placed { core: best, others }
    }

    /// A tunnel counted by [`place`](Self::place) on `core` is gone.
    pub fn left(&mut self, identity: &IdentityName, instance: &str, core: usize) {
        let Some(h) = self.by_identity.get_mut(identity) else {
            return;
        };
        if let Some(n) = h.per_core.get_mut(core) {
            *n = n.saturating_sub(1);
        }
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

    #[test]
    fn one_instance_spreads_over_cores() {
        let mut b = TunnelBook::new(2);
        let a = id("alice");
        assert_eq!(
            b.place(&a, "r1", 0, true, Refuse),
            Placement::Placed {
                core: 0,
                others: vec![]
            }
        );
        assert_eq!(
            b.place(&a, "r1", 0, true, Refuse),
            Placement::Placed {
                core: 1,
                others: vec![]
            }
        );
        assert_eq!(b.remote_core("alice", 0, 7), Some(1));
        assert_eq!(b.instances(), vec![(a.clone(), vec![("r1".into(), 2)])]);
        b.left(&a, "r1", 0);
        b.left(&a, "r1", 1);
        assert!(b.per_core().is_empty());
    }

    #[test]
    fn policies_for_a_second_instance() {
        let a = id("alice");
        for (policy, refused) in [(Share, false), (Replace, false), (Refuse, true)] {
            let mut b = TunnelBook::new(2);
            b.place(&a, "r1", 0, true, policy);
            let p = b.place(&a, "rogue", 1, true, policy);
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
        b.place(&a, "r1", 0, false, Refuse);
        assert!(matches!(
            b.place(&a, "r2", 0, false, Refuse),
            Placement::Refused { .. }
        ));
        b.left(&a, "r1", 0);
        assert!(matches!(
            b.place(&a, "r2", 0, false, Refuse),
            Placement::Placed { .. }
        ));
    }
}
