use flowwire::prelude::*;

pub struct Secret {
    key: u64,
}

#[flow]
pub struct Order {
    #[link]
    state: Secret,
}

#[flow]
impl Order {
    #[wire]
    fn step(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
