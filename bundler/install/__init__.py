"""The target side: stage a verified bundle, install it, start it, check it, commit or roll back."""
