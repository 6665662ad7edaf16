//! `weft-proxy`: the sidecar proxy on its own, what injected pods run. The
//! same as `weft proxy`, in a binary that holds only the data plane, so a
//! pod maps fewer code pages (most of a proxy's resident memory).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "weft-proxy",
    version,
    about = "The weft sidecar proxy (the same as `weft proxy`)"
)]
struct Cli {
    #[command(flatten)]
    args: weft::proxy::ProxyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    weft::init_process();
    match weft::proxy::main(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
