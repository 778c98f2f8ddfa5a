use flowwire::prelude::*;

pub struct Plain;

impl Plain {
    #[probe]
    fn read(&self) -> u32 {
        1
    }
}

fn main() {}
