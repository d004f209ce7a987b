//! POSIX ACLs (access control lists), pure: the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes in the kernel's format, and the
//! rules that tie them to a file's mode bits (what `posix_acl_equiv_mode`,
//! `posix_acl_chmod` and `posix_acl_create` do in Linux).
//!
//! The kernel checks permissions against the ACLs itself (the mount asks for
//! `FUSE_POSIX_ACL`); the file system keeps them, and keeps them in step with the
//! mode:
//! - setting an access ACL sets the mode's owner, group and other bits from it (the
//!   group bits from the mask entry if there is one), and an access ACL that says no
//!   more than the mode is not kept;
//! - a `chmod` sets the access ACL's owner, mask (or owning group) and other entries;
//! - a node made in a directory with a default ACL takes it as its access ACL (a
//!   directory also as its default ACL), with the mode asked for masking it and the
//!   process's umask not applied; elsewhere the umask applies.
//!
//! The format: a little-endian `u32` version (2), then entries of a `u16` tag, a
//! `u16` permission (`rwx` as 4, 2, 1) and a `u32` user or group id.

use crate::fs::FsError;

/// The access ACL's extended attribute.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// A directory's default ACL, inherited by what is made in it.
pub const DEFAULT: &[u8] = b"system.posix_acl_default";
/// Most entries an ACL may have.
pub const MAX_ENTRIES: usize = 128;
/// The longest encoded ACL.
pub const MAX_LEN: usize = 4 + 8 * MAX_ENTRIES;

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// The id field of entries that have none.
const UNDEFINED_ID: u32 = u32::MAX;

/// Whether `name` is one of the two ACL attributes.
pub fn is_acl(name: &[u8]) -> bool {
    name == ACCESS || name == DEFAULT
}

/// One entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

/// A valid ACL, its entries in the kernel's order (by tag, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Decodes and checks an ACL as the kernel writes it: one owner, owning group and
    /// other entry each, a mask if (and only if allowed when) there are named user or
    /// group entries, no id named twice, permissions of `rwx` only.
    pub fn decode(bytes: &[u8]) -> Result<Acl, FsError> {
        let body = bytes.get(4..).ok_or(FsError::Invalid)?;
        let version = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if version != VERSION || body.len() % 8 != 0 {
            return Err(FsError::Invalid);
        }
        if body.len() / 8 > MAX_ENTRIES {
            return Err(FsError::XattrTooLarge);
        }
        let mut entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let perm = u16::from_le_bytes([e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                let id = if matches!(tag, USER | GROUP) {
                    id
                } else {
                    UNDEFINED_ID
                };
                Entry { tag, id, perm }
            })
            .collect();
        entries.sort();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let named = count(USER) + count(GROUP);
        let valid = count(USER_OBJ) == 1
            && count(GROUP_OBJ) == 1
            && count(OTHER) == 1
            && count(MASK) <= 1
            && (named == 0 || count(MASK) == 1)
            && entries.iter().all(|e| {
                e.perm & !7 == 0
                    && matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER)
            })
            && entries
                .windows(2)
                .all(|w| (w[0].tag, w[0].id) != (w[1].tag, w[1].id));
        if !valid {
            return Err(FsError::Invalid);
        }
        Ok(Acl { entries })
    }

    /// The kernel's format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn perm_of(&self, tag: u16) -> Option<u16> {
        self.entries.iter().find(|e| e.tag == tag).map(|e| e.perm)
    }

    fn entry_mut(&mut self, tag: u16) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.tag == tag)
    }

    /// The entry that stands for the mode's group bits: the mask if there is one,
    /// else the owning group.
    fn group_tag(&self) -> u16 {
        if self.perm_of(MASK).is_some() {
            MASK
        } else {
            GROUP_OBJ
        }
    }

    /// The permission bits (`0o777`) the ACL gives the mode.
    pub fn mode_bits(&self) -> u16 {
        let p = |tag| self.perm_of(tag).unwrap_or(0);
        p(USER_OBJ) << 6 | p(self.group_tag()) << 3 | p(OTHER)
    }

    /// Whether the ACL says no more than the mode (only the three entries it has).
    pub fn is_minimal(&self) -> bool {
        self.entries.len() == 3
    }

    /// A `chmod` to `perm`: the owner, mask (or owning group) and other entries take
    /// its bits.
    pub fn chmod(&mut self, perm: u16) {
        let tag = self.group_tag();
        for (tag, bits) in [(USER_OBJ, perm >> 6), (tag, perm >> 3), (OTHER, perm)] {
            if let Some(e) = self.entry_mut(tag) {
                e.perm = bits & 7;
            }
        }
    }

    /// A default ACL inherited by a node made with mode `perm` (`0o7777`): the ACL
    /// masked by the mode, and the mode masked by the ACL (the special bits stay).
    pub fn inherit(&self, perm: u16) -> (Acl, u16) {
        let mut acl = self.clone();
        let tag = acl.group_tag();
        let mut mode = perm & 0o7777;
        for (tag, shift) in [(USER_OBJ, 6), (tag, 3), (OTHER, 0)] {
            if let Some(e) = acl.entry_mut(tag) {
                let bits = (mode >> shift) & 7;
                e.perm &= bits;
                mode &= !((bits & !e.perm) << shift);
            }
        }
        (acl, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    #[test]
    fn an_acl_gives_and_takes_the_mode_bits() {
        // user::rw- user:1000:rwx group::r-- mask::r-x other::---
        let bytes = acl(&[
            (OTHER, 0, UNDEFINED_ID),
            (USER_OBJ, 6, UNDEFINED_ID),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, UNDEFINED_ID),
            (MASK, 5, UNDEFINED_ID),
        ]);
        let mut a = Acl::decode(&bytes).unwrap();
        assert_eq!(a.mode_bits(), 0o650, "the group bits are the mask's");
        assert!(!a.is_minimal());
        // Encoded in the kernel's order.
        assert_eq!(Acl::decode(&a.encode()).unwrap(), a);
        assert_eq!(&a.encode()[4..6], &USER_OBJ.to_le_bytes());
        a.chmod(0o704);
        assert_eq!(a.mode_bits(), 0o704);
        assert_eq!(
            a.perm_of(GROUP_OBJ),
            Some(4),
            "the owning group keeps its entry"
        );
        assert_eq!(a.perm_of(MASK), Some(0));
        let minimal = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 1, 0)]);
        let m = Acl::decode(&minimal).unwrap();
        assert!(m.is_minimal());
        assert_eq!(m.mode_bits(), 0o751);
    }

    #[test]
    fn a_default_acl_and_the_mode_asked_for_mask_each_other() {
        // user::rwx group::rwx other::r-x, and a named group with a mask of rw-.
        let d = Acl::decode(&acl(&[
            (USER_OBJ, 7, 0),
            (GROUP_OBJ, 7, 0),
            (GROUP, 7, 50),
            (MASK, 6, 0),
            (OTHER, 5, 0),
        ]))
        .unwrap();
        let (a, mode) = d.inherit(0o2666);
        assert_eq!(
            mode, 0o2664,
            "other loses w (not in the ACL), group keeps the mask's rw"
        );
        assert_eq!(a.mode_bits(), 0o664);
        assert_eq!(a.perm_of(GROUP), Some(7), "named entries are not masked");
        assert_eq!(a.perm_of(OTHER), Some(4));
    }

    #[test]
    fn invalid_acls_are_refused() {
        let base = [(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 1, 0)];
        for bad in [
            acl(&base[..2]),
            acl(&[base[0], base[1], base[2], (USER, 7, 3)]),
            acl(&[
                base[0],
                base[1],
                base[2],
                (MASK, 7, 0),
                (USER, 7, 3),
                (USER, 5, 3),
            ]),
            acl(&[base[0], base[1], base[2], base[2]]),
            acl(&[base[0], base[1], (OTHER, 8, 0)]),
            acl(&[base[0], base[1], base[2], (0x40, 7, 0)]),
            vec![2, 0, 0],
            acl(&base)[..13].to_vec(),
        ] {
            assert_eq!(Acl::decode(&bad), Err(FsError::Invalid), "{bad:?}");
        }
        let mut v1 = acl(&base);
        v1[0] = 1;
        assert_eq!(Acl::decode(&v1), Err(FsError::Invalid));
        let many: Vec<_> = (0..MAX_ENTRIES as u32).map(|i| (USER, 7, i)).collect();
        let mut all = base.to_vec();
        all.extend(many);
        all.push((MASK, 7, 0));
        assert_eq!(Acl::decode(&acl(&all)), Err(FsError::XattrTooLarge));
    }
}
