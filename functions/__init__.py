"""The two functions lensflow deploys: predict (serving) and train (a training round)."""
