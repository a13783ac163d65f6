"""Small runnable examples of the library on toy problems."""
