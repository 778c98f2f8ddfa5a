use flowwire::prelude::*;

#[driver(timeout = "30 seconds")]
pub trait Payment {
    async fn charge(&self, cents: u64) -> Result<u64, String>;
}

fn main() {}
