//! Choosing blocks that may be decoded together (DESIGN-NOTES I3, report 5.3.1, 5.4).
//!
//! Every read reply carries the versions its bytes reflect: a data block at position
//! i tracks only version i; a parity block tracks all k. Bytes are a function of the
//! versions (each update is applied whole, in version order, with the same delta
//! everywhere), so k replies reflect one state of the stripe exactly when there is a
//! version vector V such that each data reply i has version V\[i\] and each parity
//! reply has versions V. Decoding such replies yields each block as of V; decoding
//! any other mix could produce bytes that never existed, which is what a degraded
//! read must never return.
//!
//! Pure: no I/O. The read path, scrub and node rebuild all use it.

use drs_proto::Version;

/// One reply as the selector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Position in the stripe (0..k data, k..k+m parity).
    pub position: usize,
    /// The versions the reply reflects (length k).
    pub versions: Vec<Version>,
}

/// A choice of k replies that reflect the stripe state `versions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Indices into the `seen` slice, k of them.
    pub chosen: Vec<usize>,
    /// The state they reflect. For data-only choices, index i is the version of data
    /// block i.
    pub versions: Vec<Version>,
}

fn compatible(k: usize, s: &Seen, v: &[Version]) -> bool {
    if s.position < k {
        s.versions.get(s.position) == v.get(s.position)
    } else {
        s.versions.as_slice() == v
    }
}

/// Finds k replies reflecting one state, preferring the newest state (largest version
/// sum) and, within it, data replies (decoding is cheaper). `None` when no k replies
/// agree.
pub fn choose(k: usize, seen: &[Seen]) -> Option<Choice> {
    let mut candidates: Vec<Vec<Version>> = seen
        .iter()
        .filter(|s| s.position >= k)
        .map(|s| s.versions.clone())
        .collect();
    // Data-only candidate: each data reply defines its own index.
    let mut data_only = vec![0; k];
    let mut data_count = 0;
    for s in seen.iter().filter(|s| s.position < k) {
        if let Some(v) = s.versions.get(s.position) {
            data_only[s.position] = *v;
            data_count += 1;
        }
    }
    if data_count >= k {
        candidates.push(data_only);
    }
    candidates.sort_by_key(|v| std::cmp::Reverse(v.iter().sum::<Version>()));
    candidates.dedup();
    for v in candidates {
        let mut chosen: Vec<usize> = (0..seen.len())
            .filter(|&i| seen[i].position < k && compatible(k, &seen[i], &v))
            .collect();
        chosen.extend(
            (0..seen.len()).filter(|&i| seen[i].position >= k && compatible(k, &seen[i], &v)),
        );
        // One reply per position.
        let mut positions = std::collections::BTreeSet::new();
        chosen.retain(|&i| positions.insert(seen[i].position));
        if chosen.len() >= k {
            chosen.truncate(k);
            return Some(Choice {
                chosen,
                versions: v,
            });
        }
    }
    None
}

/// [`choose`], for a reader that needs data block `index` at version `at_least` or
/// newer: replies that track it at an older version (its own data reply, parity
/// replies) are left out, however many agree. `chosen` indexes `seen`.
pub fn choose_at_least(k: usize, seen: &[Seen], index: usize, at_least: Version) -> Option<Choice> {
    // Versions are kept for data blocks only: a parity block (index >= k) has none.
    if at_least == 0 || index >= k {
        return choose(k, seen);
    }
    let usable: Vec<usize> = (0..seen.len())
        .filter(|&i| {
            let s = &seen[i];
            let tracks = s.position >= k || s.position == index;
            !tracks || s.versions.get(index).is_some_and(|&v| v >= at_least)
        })
        .collect();
    let subset: Vec<Seen> = usable.iter().map(|&i| seen[i].clone()).collect();
    let mut c = choose(k, &subset)?;
    for i in &mut c.chosen {
        *i = usable[*i];
    }
    Some(c)
}

/// The newest version of each data index any reply knows of: what a lagging node
/// must reach for the replies to agree.
pub fn newest(k: usize, seen: &[Seen]) -> Vec<Version> {
    let mut v = vec![0; k];
    for s in seen {
        if s.position < k {
            if let Some(x) = s.versions.get(s.position) {
                v[s.position] = v[s.position].max(*x);
            }
        } else {
            for (a, b) in v.iter_mut().zip(&s.versions) {
                *a = (*a).max(*b);
            }
        }
    }
    v
}

/// True when the reply reflects `v` for everything it tracks.
pub fn agrees(k: usize, s: &Seen, v: &[Version]) -> bool {
    compatible(k, s, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(p: usize, v: Version, k: usize) -> Seen {
        let mut versions = vec![0; k];
        versions[p] = v;
        Seen {
            position: p,
            versions,
        }
    }

    fn p(pos: usize, v: &[Version]) -> Seen {
        Seen {
            position: pos,
            versions: v.to_vec(),
        }
    }

    #[test]
    fn picks_agreeing_replies_and_skips_a_stale_parity() {
        // k = 2, m = 2: data 0 at v3, parity 2 at (3,1), parity 3 stale at (2,1).
        let seen = vec![d(0, 3, 2), p(2, &[3, 1]), p(3, &[2, 1])];
        let c = choose(2, &seen).unwrap();
        assert_eq!(c.versions, vec![3, 1]);
        assert_eq!(c.chosen, vec![0, 1]);
    }

    #[test]
    fn no_mix_of_before_and_after() {
        // Data 0 already at v2, parity at v1: nothing agrees.
        let seen = vec![d(0, 2, 2), p(2, &[1, 0])];
        assert_eq!(choose(2, &seen), None);
        assert_eq!(newest(2, &seen), vec![2, 0]);
    }

    #[test]
    fn prefers_the_newest_state() {
        let seen = vec![d(1, 0, 2), p(2, &[1, 0]), p(3, &[2, 0])];
        let c = choose(2, &seen).unwrap();
        assert_eq!(c.versions, vec![2, 0]);
        assert_eq!(c.chosen, vec![0, 2]);
    }

    #[test]
    fn a_locked_reader_never_takes_an_older_version_of_its_block() {
        // k = 4, m = 2, data 0 down. An update of block 0 to v3 reached parity 4 but
        // not yet parity 5. The other data blocks and parity 5 agree on a state with
        // block 0 at v2, and they answered first: a reader holding block 0's lock at
        // v3 must not decode that.
        let seen = vec![d(1, 0, 4), d(2, 0, 4), d(3, 0, 4), p(5, &[2, 0, 0, 0])];
        assert_eq!(choose(4, &seen).unwrap().versions, vec![2, 0, 0, 0]);
        assert_eq!(choose_at_least(4, &seen, 0, 3), None);
        let mut seen = seen;
        seen.push(p(4, &[3, 0, 0, 0]));
        let c = choose_at_least(4, &seen, 0, 3).unwrap();
        assert_eq!(c.versions, vec![3, 0, 0, 0]);
        assert_eq!(c.chosen, vec![0, 1, 2, 4], "indices into the replies given");
        // Block 0's own reply at an older version is left out too.
        let own = vec![d(0, 2, 2), d(1, 4, 2), p(2, &[3, 4])];
        assert_eq!(choose_at_least(2, &own, 0, 3).unwrap().chosen, vec![1, 2]);
        // No bound, or a parity block (which has no version of its own): as choose.
        assert_eq!(choose_at_least(4, &seen, 0, 0), choose(4, &seen));
        assert_eq!(choose_at_least(4, &seen, 5, 0), choose(4, &seen));
        assert_eq!(choose_at_least(4, &seen, 5, 9), choose(4, &seen));
    }

    #[test]
    fn data_only() {
        let seen = vec![d(0, 5, 2), d(1, 7, 2)];
        assert_eq!(choose(2, &seen).unwrap().versions, vec![5, 7]);
    }

    proptest! {
        /// Whatever the replies, a choice is k distinct positions that all agree with
        /// the chosen versions; and if all replies reflect one state, one is found.
        #[test]
        fn choices_always_agree(k in 1usize..5, m in 1usize..4, raw in proptest::collection::vec((0usize..8, proptest::collection::vec(0u64..3, 4)), 0..8)) {
            let seen: Vec<Seen> = raw.into_iter().filter(|(pos, _)| *pos < k + m).map(|(pos, mut v)| { v.truncate(k); v.resize(k, 0); Seen { position: pos, versions: v } }).collect();
            if let Some(c) = choose(k, &seen) {
                prop_assert_eq!(c.chosen.len(), k);
                let mut ps: Vec<usize> = c.chosen.iter().map(|&i| seen[i].position).collect();
                ps.sort_unstable();
                ps.dedup();
                prop_assert_eq!(ps.len(), k);
                for &i in &c.chosen {
                    prop_assert!(agrees(k, &seen[i], &c.versions));
                }
            }
        }

        #[test]
        fn one_state_is_always_found(k in 1usize..5, m in 1usize..4, state in proptest::collection::vec(0u64..5, 4), mask in 0u32..128) {
            let state = &state[..k];
            let seen: Vec<Seen> = (0..k + m).filter(|p| mask & (1 << p) != 0).map(|pos| {
                if pos < k { d(pos, state[pos], k) } else { p(pos, state) }
            }).collect();
            let c = choose(k, &seen);
            prop_assert_eq!(c.is_some(), seen.len() >= k);
        }
    }
}
