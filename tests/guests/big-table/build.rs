//! Stable Rust cannot grow a wasm table at run time (there is no `table.grow`
//! intrinsic), so this fixture asks the linker to place its function table's entries
//! at 200 000: the table then starts with more than 200 000 elements, which the host's
//! table limit (100 000) must refuse when the instance is created.

fn main() {
    println!("cargo:rustc-link-arg-cdylib=--table-base=200000");
}
