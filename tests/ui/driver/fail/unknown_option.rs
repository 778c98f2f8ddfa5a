use flowwire::prelude::*;

#[driver(timout = "30s")]
pub trait Payment {
    async fn charge(&self, cents: u64) -> Result<u64, String>;
}

fn main() {}
