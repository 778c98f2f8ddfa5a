use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[impulse]
    fn cancel(&mut self) {}
}

fn main() {}
