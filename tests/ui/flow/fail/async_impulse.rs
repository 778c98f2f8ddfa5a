use flowwire::prelude::*;

#[flow]
pub struct Order {
    #[link]
    state: u32,
}

#[flow]
impl Order {
    #[impulse]
    async fn cancel(&mut self) {}

    #[wire]
    fn step(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
