//! Answers `fixed` with `http://10.1.0.2:80` (version b of the `fixed` plugin).

const ADDRESS: &str = "10.1.0.2";

include!("../fixed.rs");
