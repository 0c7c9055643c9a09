//! Workspace checks live in `tests/`, so `cargo test` is the whole gate. This binary is
//! only a placeholder for future maintenance tasks.

fn main() {
    eprintln!("xtask: nothing to run; the checks are `cargo test -p xtask`");
}
