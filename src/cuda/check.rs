//! `lift gpu-check` (written next).
#[derive(clap::Args)]
pub struct CheckArgs {}
pub fn run(_a: &CheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
