#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_user_fuzz::net_queue::run(data));
