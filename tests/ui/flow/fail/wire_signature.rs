use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[wire]
    fn step(&self, extra: u32) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
