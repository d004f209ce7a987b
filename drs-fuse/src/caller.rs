//! What FUSE does not say about the thread behind a request: its supplementary
//! groups and whether it has CAP_FSETID, read from `/proc/<tid>/status`. The
//! kernel passes only the thread's fsuid, fsgid and id.

/// A requester's groups (its fsgid and supplementary groups) and CAP_FSETID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub groups: Vec<u32>,
    pub fsetid: bool,
}

impl Creds {
    /// Whether the requester is a member of group `gid`.
    pub fn member_of(&self, gid: u32) -> bool {
        self.groups.contains(&gid)
    }
}

/// CAP_FSETID's bit in a capability set (linux/capability.h).
const CAP_FSETID: u32 = 4;

/// The credentials of thread `tid`, whose fsgid the request carried. A thread whose
/// status cannot be read (it exited, `/proc` is mounted with `hidepid`, it is in
/// another pid namespace) counts as a member of its fsgid alone, without
/// capabilities: what it may lose is then a set-gid bit, never a check it should
/// have failed.
pub fn creds(tid: u32, fsgid: u32) -> Creds {
    let status = (tid != 0)
        .then(|| std::fs::read_to_string(format!("/proc/{tid}/status")).ok())
        .flatten();
    match status {
        Some(s) => creds_in(&s, fsgid),
        None => {
            tracing::debug!(tid, "cannot read a requester's /proc status");
            Creds {
                groups: vec![fsgid],
                fsetid: false,
            }
        }
    }
}

/// [`creds`] of a `/proc/<tid>/status` text.
fn creds_in(status: &str, fsgid: u32) -> Creds {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mut groups = vec![fsgid];
    groups.extend(
        field("Groups:")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|g| g.parse::<u32>().ok()),
    );
    let effective = field("CapEff:")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0);
    Creds {
        groups,
        fsetid: effective & (1 << CAP_FSETID) != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_fsetid_come_from_the_status() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                      Groups:\t4 24 27 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                      CapEff:\t0000000000000000\n";
        let c = creds_in(status, 100);
        assert_eq!(c.groups, vec![100, 4, 24, 27]);
        assert!(!c.fsetid);
        assert!(c.member_of(24) && c.member_of(100) && !c.member_of(0));
        let root = "Groups:\t\nCapEff:\t000001ffffffffff\n";
        let c = creds_in(root, 0);
        assert_eq!(c.groups, vec![0]);
        assert!(c.fsetid);
        // Every capability but CAP_FSETID.
        let c = creds_in("CapEff:\t000001ffffffffef\n", 5);
        assert!(!c.fsetid);
        // Nothing readable: the fsgid alone, no capability.
        assert_eq!(
            creds_in("garbage", 7),
            Creds {
                groups: vec![7],
                fsetid: false
            }
        );
    }

    #[test]
    fn this_process_reads_its_own_status() {
        use std::os::unix::fs::MetadataExt;
        // /proc/self is owned by the process's effective user and group.
        let gid = std::fs::metadata("/proc/self").map_or(0, |m| m.gid());
        let c = creds(std::process::id(), gid);
        // `id -G` (the effective group, then the supplementary ones) agrees.
        let id = std::process::Command::new("id").arg("-G").output();
        if let Some(out) = id.ok().filter(|o| o.status.success()) {
            let mut want: Vec<u32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
            let mut got = c.groups.clone();
            for v in [&mut want, &mut got] {
                v.sort_unstable();
                v.dedup();
            }
            assert_eq!(got, want);
        }
        // A thread that is gone: its fsgid alone.
        assert_eq!(creds(u32::MAX, 9).groups, vec![9]);
    }
}
