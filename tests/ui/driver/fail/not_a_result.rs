use flowwire::prelude::*;

#[driver]
pub trait Payment {
    async fn charge(&self, cents: u64) -> u64;
}

fn main() {}
