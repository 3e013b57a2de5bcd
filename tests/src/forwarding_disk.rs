//! [`forward_to_inner_disk!`](crate::forward_to_inner_disk): the part of a
//! test disk that only passes calls on to the disk it wraps.

/// Expands, inside `impl BlockBackend for T` where `T` has a field `inner`
/// holding a block back end, to the methods that only forward to `inner`:
/// `size`, `write_at`, `flush`, `discard` and `write_zeroes`, and to a
/// writable `read_only`. The test disk writes `read_at` and `id` itself:
/// what it changes is how reads behave.
#[macro_export]
macro_rules! forward_to_inner_disk {
    () => {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> ::std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> ::std::io::Result<()> {
            self.inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> ::std::io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> ::std::io::Result<()> {
            self.inner.write_zeroes(offset, len)
        }
        fn read_only(&self) -> bool {
            false
        }
    };
}
