use flowwire::prelude::*;

#[driver]
pub trait Payment {
    #[driver(ambiguous = "maybe")]
    async fn charge(&self, cents: u64) -> Result<u64, String>;
}

fn main() {}
