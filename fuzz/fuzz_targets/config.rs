//! The host config parser: any text is a config or an error naming where it is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Err(e) = wasd::Config::from_toml(input, std::path::Path::new("/srv")) {
        assert!(!e.message.is_empty());
    }
});
