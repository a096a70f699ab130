//! `meshctl check` (being written).

use crate::{Outcome, output::Format};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _format: Format) -> anyhow::Result<Outcome> {
    anyhow::bail!("not written yet")
}
