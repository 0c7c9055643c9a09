//! `panel`: the Mamba control plane. Its storage, identity and REST API are the next piece
//! of work (see ROADMAP.md); until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!("panel: the control plane is not built yet; run `scripts/run.sh` for wings with a demo server");
    std::process::ExitCode::from(2)
}
