//! The few socket options and interface ioctls no safe wrapper covers.
#![expect(
    unsafe_code,
    reason = "raw getsockopt for SO_NETNS_COOKIE, the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls and \
              glibc's malloc_trim, which nix does not wrap"
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

/// Bring the loopback interface of the calling thread's network namespace up (what
/// `ip link set lo up` does), through the `SIOCGIFFLAGS`/`SIOCSIFFLAGS` ioctls on a throwaway
/// socket of that namespace.
pub fn loopback_up() -> std::io::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: `sock` is a live socket and `req` a properly initialised ifreq that outlives the
    // call; SIOCGIFFLAGS writes only `ifr_flags` inside it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifr_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Hands the free pages inside the C heap back to the system (glibc's `malloc_trim(0)`, which
/// also releases whole free pages between live allocations, not only the top of the heap).
/// Returns whether anything was released; other C libraries have nothing to call, so `false`.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks and touches only free memory;
        // it is documented as safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
