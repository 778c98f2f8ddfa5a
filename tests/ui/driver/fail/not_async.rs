use flowwire::prelude::*;

#[driver]
pub trait Payment {
    fn charge(&self, cents: u64) -> Result<u64, String>;
}

fn main() {}
