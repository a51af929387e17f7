"""The Flower ClientApp: one edge device's round of budgeted local adaptation."""
