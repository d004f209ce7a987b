//! The one table from operation errors to errno values.

use drs_meta::fs::FsError;

use crate::ops::OpError;

/// The errno an application sees for `e`. Namespace refusals are POSIX errors; a
/// cluster that cannot answer (too many nodes down, no metadata quorum, past the
/// operation timeout) is EIO.
pub fn errno(e: &OpError) -> i32 {
    match e {
        OpError::Fs(f) => match f {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NotPermitted => libc::EPERM,
            FsError::TooLarge => libc::EFBIG,
            FsError::NotFormatted => libc::EIO,
            FsError::NoXattr => libc::ENODATA,
            FsError::XattrNotSupported => libc::EOPNOTSUPP,
            FsError::XattrTooLarge => libc::ERANGE,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::NoLocks => libc::ENOLCK,
            _ => libc::EIO,
        },
        OpError::Unsupported(_) => libc::EOPNOTSUPP,
        OpError::Interrupted => libc::EINTR,
        OpError::Unmounting => libc::ENOTCONN,
        OpError::Stale => libc::ESTALE,
        OpError::NoData => libc::ENXIO,
        OpError::Meta(_)
        | OpError::Data(_)
        | OpError::Timeout(_)
        | OpError::Unexpected(_)
        | OpError::WriteBack(_)
        | OpError::SessionLapsed(_)
        | OpError::Lost
        | OpError::LocksLost => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_refusals_keep_their_posix_meaning_and_the_rest_is_eio() {
        assert_eq!(errno(&OpError::Fs(FsError::NotFound)), libc::ENOENT);
        assert_eq!(errno(&OpError::Fs(FsError::NotEmpty)), libc::ENOTEMPTY);
        assert_eq!(errno(&OpError::Fs(FsError::NoXattr)), libc::ENODATA);
        assert_eq!(
            errno(&OpError::Fs(FsError::XattrNotSupported)),
            libc::EOPNOTSUPP
        );
        assert_eq!(errno(&OpError::Fs(FsError::NoSpace)), libc::ENOSPC);
        assert_eq!(errno(&OpError::Unsupported("x")), libc::EOPNOTSUPP);
        assert_eq!(errno(&OpError::Fs(FsError::WouldBlock)), libc::EAGAIN);
        assert_eq!(errno(&OpError::Fs(FsError::NoLocks)), libc::ENOLCK);
        assert_eq!(errno(&OpError::Interrupted), libc::EINTR);
        assert_eq!(
            errno(&OpError::Timeout(std::time::Duration::from_secs(1))),
            libc::EIO
        );
        assert_eq!(errno(&OpError::WriteBack("x".into())), libc::EIO);
        assert_eq!(errno(&OpError::LocksLost), libc::EIO);
        assert_eq!(errno(&OpError::Unmounting), libc::ENOTCONN);
        assert_eq!(errno(&OpError::NoData), libc::ENXIO);
        assert_eq!(
            errno(&OpError::Fs(FsError::NotFound).on_inode()),
            libc::ESTALE
        );
        assert_eq!(
            errno(&OpError::Fs(FsError::Exists).on_inode()),
            libc::EEXIST
        );
    }
}
