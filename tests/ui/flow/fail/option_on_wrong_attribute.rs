use flowwire::prelude::*;

#[flow(timeout = "30s")]
pub struct Order {
    #[link]
    state: u32,
}

fn main() {}
