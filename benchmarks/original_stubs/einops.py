"""stand-in: unused by the visualisation path"""
