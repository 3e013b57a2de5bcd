//! Non-blocking `recvmsg`/`sendmsg` with `SCM_RIGHTS` file descriptors.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};

/// Most fds accepted in one `recvmsg`; more truncates the control data and
/// the message is refused (the kernel closes the excess).
pub const MAX_RECV_FDS: usize = 64;

/// Result of one receive.
pub struct Received {
    /// Bytes read; 0 means end of stream.
    pub bytes: usize,
    /// Descriptors that came with the bytes (owned, close-on-exec).
    pub fds: Vec<File>,
    /// The control data was truncated: some fds were lost.
    pub truncated: bool,
}

/// Control buffer for receiving: one cmsghdr (16 bytes) plus
/// `MAX_RECV_FDS` descriptors, in u64 words.
const RECV_CMSG_WORDS: usize = (16 + MAX_RECV_FDS * 4) / 8;
/// Control buffer for sending.
const SEND_CMSG_WORDS: usize = 80;

/// Receives into `buf` with any attached fds. `Err(WouldBlock)` when no
/// data is available.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; RECV_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: msg points at live buffers sized as declared above.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // Each received fd is new and owned by us.
                    fds.push(File::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends as much of `bufs` as the socket takes, with `fds` attached to the
/// first byte. Returns the bytes sent; `Err(WouldBlock)` when none.
pub fn send_with_fds(fd: RawFd, bufs: &[&[u8]], fds: &[RawFd]) -> io::Result<usize> {
    // A few buffers at most (header and payload): no allocation per send.
    const MAX_BUFS: usize = 4;
    if bufs.len() > MAX_BUFS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_BUFS];
    for (iov, b) in iovs.iter_mut().zip(bufs) {
        iov.iov_base = b.as_ptr() as *mut libc::c_void;
        iov.iov_len = b.len();
    }
    let mut cmsg_buf = [0u64; SEND_CMSG_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len();
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        if space > std::mem::size_of_val(&cmsg_buf) {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes, enough for one
        // cmsghdr with `fds.len()` descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: msg points at live buffers sized as declared above.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_with_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(b"hello").unwrap();
        let n = send_with_fds(a.as_raw_fd(), &[b"ab", b"cd"], &[f.as_raw_fd()]).unwrap();
        assert_eq!(n, 4);
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..r.bytes], b"abcd");
        assert!(!r.truncated);
        let mut got = r.fds.into_iter().next().unwrap();
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        let e = recv_with_fds(b.as_raw_fd(), &mut buf).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn too_many_fds_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<RawFd> = (0..70).map(|_| a.as_raw_fd()).collect();
        send_with_fds(a.as_raw_fd(), &[b"x"], &fds).unwrap();
        let mut buf = [0u8; 4];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert!(r.truncated);
        assert!(r.fds.len() <= MAX_RECV_FDS);
    }
}
