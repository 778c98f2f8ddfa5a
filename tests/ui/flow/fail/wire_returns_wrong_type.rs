use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[wire]
    fn step(&mut self) -> Result<Command<Self>, String> {
        Ok(Command::finish())
    }
}

fn main() {}
