//! Answers `fixed` with `http://10.1.0.1:80` (version a of the `fixed` plugin).

const ADDRESS: &str = "10.1.0.1";

include!("../fixed.rs");
