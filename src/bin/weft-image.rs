//! `weft-image`: builds the weft container image as an OCI image archive
//! without a container engine (`make image`, `make image-debs`); the work is
//! `weft::image`. A developer tool of its own rather than a `weft`
//! subcommand, so the binary the image ships does not carry an image
//! builder.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weft-image",
    version,
    about = "Build the weft container image (OCI archive)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the Debian packages the image holds (apt-get download) into
    /// DIR, skipping those already there.
    Debs {
        #[arg(long, default_value = "target/image/debs")]
        dir: PathBuf,
    },
    /// Build the image archive from the binaries in --binaries (stripped of
    /// debug info into --work-dir first) and the .debs in --debs.
    Build {
        /// Where weft, weft-proxy and weft-demo are.
        #[arg(long, default_value = "target/release")]
        binaries: PathBuf,
        #[arg(long, default_value = "target/image/debs")]
        debs: PathBuf,
        /// The stripped copies of the binaries go here.
        #[arg(long, default_value = "target/image/bin")]
        work_dir: PathBuf,
        /// Default: target/image/weft-<version>.oci.tar.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Every file's mtime and the image's creation time (reproducible builds).
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        source_date_epoch: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Debs { dir } => {
            let debs = weft::image::fetch_debs(&dir)?;
            for d in debs {
                println!("{}", d.display());
            }
        }
        Command::Build {
            binaries,
            debs,
            work_dir,
            out,
            source_date_epoch,
        } => {
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "target/image/weft-{}.oci.tar",
                    env!("CARGO_PKG_VERSION")
                ))
            });
            let mut stripped = Vec::new();
            for name in weft::image::BINARIES {
                let src = binaries.join(name);
                if !src.is_file() {
                    anyhow::bail!("{}: not built (make build)", src.display());
                }
                stripped.push(weft::image::strip_debug_into(&src, &work_dir)?);
            }
            let [weft_bin, proxy, demo]: [PathBuf; 3] = stripped
                .try_into()
                .map_err(|_| anyhow::anyhow!("three binaries"))?;
            let mut spec = weft::image::ImageSpec::new([weft_bin, proxy, demo], &debs)?;
            spec.source_date_epoch = source_date_epoch;
            let image = weft::image::build(&spec, &out).context("building the image")?;
            let size = std::fs::metadata(&image.path)
                .with_context(|| format!("{}", image.path.display()))?
                .len();
            println!("{}", image.reference);
            println!(
                "  archive   {} ({:.1} MB)",
                image.path.display(),
                size as f64 / 1e6
            );
            println!("  manifest  {}", image.manifest.digest);
            println!(
                "  layer     {} ({:.1} MB compressed, {:.1} MB unpacked)",
                image.layer.digest,
                image.layer.size as f64 / 1e6,
                image.layer_uncompressed_size as f64 / 1e6
            );
        }
    }
    Ok(())
}
