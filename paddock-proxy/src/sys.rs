//! The few socket options no safe wrapper covers.
#![expect(
    unsafe_code,
    reason = "raw getsockopt for SO_NETNS_COOKIE, which nix does not wrap"
)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the socket's network namespace, the same
/// value `bpf_get_netns_cookie` returns for it.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow; `cookie` and `len`
    // point to properly sized, writable locals that outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
