use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[wire]
    fn first(&mut self) -> Command<Self> {
        Command::finish()
    }

    #[wire]
    fn second(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
