"""What test modules share: servers and functions to drive, waiting, images, manifests.

Test modules import helpers from here, never from each other."""
