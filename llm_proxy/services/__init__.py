"""Steps both processes take on a request, written once against the storage interfaces."""
