use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[wire]
    fn step(&mut self) -> Command<Self> {
        Command::finish()
    }

    #[correlate]
    fn key(&mut self, salt: u32) -> u32 {
        self.state + salt
    }

    #[correlate]
    fn other(&self) -> u32 {
        self.state
    }
}

fn main() {}
