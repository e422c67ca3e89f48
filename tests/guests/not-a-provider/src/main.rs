//! A valid component (a WASI command) that exports no `wasd:provider/resolver`.

fn main() {
    println!("not a provider");
}
