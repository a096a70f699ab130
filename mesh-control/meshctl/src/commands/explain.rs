//! `meshctl explain` (being written).

use crate::{Outcome, context::Context, output::Format};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_context: &Context, _args: Args, _format: Format) -> anyhow::Result<Outcome> {
    anyhow::bail!("not written yet")
}
