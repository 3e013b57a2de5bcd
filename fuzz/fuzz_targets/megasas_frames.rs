#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_user_fuzz::megasas_frames::run(data));
