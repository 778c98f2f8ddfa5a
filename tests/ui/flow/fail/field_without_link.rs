use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
    cache: u32,
}

fn main() {}
