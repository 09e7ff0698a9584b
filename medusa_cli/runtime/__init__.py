"""Loading a compiled heads library with its packed parameters and running it. Imports nothing
of the compiler: a serving machine needs only TVM's runtime."""
