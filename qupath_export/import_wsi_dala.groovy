/*
 * Import wsi-dala results into the open image and show tumour probability as a measurement map.
 *
 * Run from QuPath's script editor (Automate > Script editor) with the slide open. Set `folder` to the
 * run folder that `wsi-dala run` printed; the script imports <slide>.tiles.geojson[.gz] (tiles, as
 * detections with measurements) and <slide>.tumour.geojson[.gz] (tumour regions, as annotations),
 * then colours the tiles by "Tumor probability" over the fixed range 0-1 (QuPath would otherwise
 * stretch the colour map to the data's min-max). Tested against the rules of QuPath 0.4-0.6.
 */
import qupath.lib.gui.tools.MeasurementMapper

def folder = new File('/path/to/wsi-dala/run')   // <- the run folder
def measurement = 'Tumor probability'
def colorMapName = 'Viridis'

def files = folder.listFiles().findAll {
    it.name.endsWith('.tiles.geojson') || it.name.endsWith('.tiles.geojson.gz') ||
    it.name.endsWith('.tumour.geojson') || it.name.endsWith('.tumour.geojson.gz')
}
if (files.isEmpty()) {
    println "No wsi-dala GeoJSON files in ${folder}"
    return
}
files.sort { it.name }.each { file ->
    println "Importing ${file.name}"
    importObjectsFromFile(file.absolutePath)
}

def viewer = getCurrentViewer()
if (viewer == null) {
    println 'Objects imported; open the image in a viewer to see the measurement map.'
    return
}
def colorMapper = MeasurementMapper.loadColorMappers().find { it.name == colorMapName }
def mapper = new MeasurementMapper(colorMapper, measurement, getDetectionObjects())
mapper.setDisplayMinValue(0.0)
mapper.setDisplayMaxValue(1.0)
viewer.getOverlayOptions().setMeasurementMapper(mapper)
viewer.getOverlayOptions().setFillDetections(true)
println "Measurement map: ${measurement} (0-1, ${colorMapName})"
