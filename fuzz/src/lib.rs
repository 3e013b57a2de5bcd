//! Shared code of the fuzz targets: the input formats (a decoder that
//! accepts any bytes and an encoder the seed generator uses), a small PCI
//! test device, and the harnesses that drive the library.
//!
//! Every target takes raw bytes and decodes them with [`Reader`], whose
//! reads never fail (missing bytes read as zero). The formats are simple
//! enough that `examples/gen_corpus.rs` writes exact seeds for them with
//! [`Writer`], so the fuzzer starts from real protocol traffic.

pub mod blk_queue;
pub mod megasas_frames;
pub mod net_queue;
pub mod pci_config;
pub mod scsi_cdb;
pub mod server_stream;
pub mod test_device;
pub mod wire_decode;

/// Reads little-endian fields from fuzz input; past the end every read
/// yields zeros (or an empty slice).
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads `data` from the start.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.remaining());
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        s
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.remaining())
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    /// A u16 length followed by that many bytes.
    pub fn blob(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }
}

/// Builds inputs in the format [`Reader`] decodes.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// A byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A u16 length and the bytes (at most 65535 of them).
    pub fn blob(&mut self, v: &[u8]) -> &mut Self {
        let v = &v[..v.len().min(u16::MAX as usize)];
        self.u16(v.len() as u16).bytes(v)
    }
}

/// A memfd of `size` bytes (the client's guest RAM, or a device's BAR).
pub fn memfd(name: &std::ffi::CStr, size: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: `name` is NUL-terminated; the fd is checked, then owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).expect("ftruncate memfd");
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_pads_with_zeros() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), 0x0201);
        assert_eq!(r.u32(), 3);
        assert!(r.is_empty());
        assert_eq!(r.u64(), 0);
        assert!(r.blob().is_empty());
    }

    #[test]
    fn writer_reader_round_trip() {
        let mut w = Writer::default();
        w.u8(7).u16(0x1234).u32(5).u64(u64::MAX).blob(b"abc");
        let mut r = Reader::new(&w.0);
        assert_eq!(
            (r.u8(), r.u16(), r.u32(), r.u64()),
            (7, 0x1234, 5, u64::MAX)
        );
        assert_eq!(r.blob(), b"abc");
        assert!(r.is_empty());
    }
}
