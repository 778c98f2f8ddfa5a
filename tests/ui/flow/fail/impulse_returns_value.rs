use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[impulse]
    fn bump(&mut self) -> u32 {
        self.state += 1;
        self.state
    }

    #[wire]
    fn step(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
