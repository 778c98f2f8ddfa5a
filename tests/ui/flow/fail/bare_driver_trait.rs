use flowwire::prelude::*;

#[driver]
pub trait Pay {
    async fn charge(&self, cents: u64) -> Result<u64, String>;
}

#[flow]
pub struct Order {
    #[link]
    state: u32,
    #[link]
    pay: Pay,
}

fn main() {}
