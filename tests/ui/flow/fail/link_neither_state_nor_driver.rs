use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
    #[link]
    name: &'static str,
}

fn main() {}
