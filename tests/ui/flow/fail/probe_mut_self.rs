use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[probe]
    fn count(&mut self) -> u32 {
        self.state
    }

    #[wire]
    fn step(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
